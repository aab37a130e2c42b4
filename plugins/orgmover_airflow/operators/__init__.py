from orgmover_airflow.operators.move import (CopyTableOperator, PrecopyDoneOperator, SyncDeletionsOperator, SyncSharedOperator, SyncTableOperator, GoNoGoOperator,
                                             MaintenanceOnOperator, OrgMoveBaseOperator, PlanOperator,
                                             PreflightOperator, PrepareTargetOperator, ReleaseOperator,
                                             RollbackOperator, SummaryOperator, SwitchoverOperator,
                                             ValidateTableOperator)

__all__ = ["CopyTableOperator", "PrecopyDoneOperator", "SyncDeletionsOperator", "SyncSharedOperator", "SyncTableOperator", "GoNoGoOperator", "MaintenanceOnOperator",
           "OrgMoveBaseOperator", "PlanOperator", "PreflightOperator", "PrepareTargetOperator", "ReleaseOperator",
           "RollbackOperator", "SummaryOperator", "SwitchoverOperator", "ValidateTableOperator"]
