from orgmover_airflow.operators.move import (CopyTableOperator, ForeignKeyCheckOperator, GoNoGoOperator,
                                             MaintenanceOnOperator, OrgMoveBaseOperator, PlanOperator,
                                             PreflightOperator, PrepareTargetOperator, ReleaseOperator,
                                             RollbackOperator, SummaryOperator, SwitchoverOperator,
                                             ValidateTableOperator)

__all__ = ["CopyTableOperator", "ForeignKeyCheckOperator", "GoNoGoOperator", "MaintenanceOnOperator",
           "OrgMoveBaseOperator", "PlanOperator", "PreflightOperator", "PrepareTargetOperator", "ReleaseOperator",
           "RollbackOperator", "SummaryOperator", "SwitchoverOperator", "ValidateTableOperator"]
