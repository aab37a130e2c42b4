from orgmover_airflow.operators.move import (CleanupSourceOperator, CopyTableOperator, PrecopyDoneOperator, SyncDeletionsOperator, SyncSharedOperator, SyncTableOperator, GoNoGoOperator,
                                             MaintenanceOnOperator, OrgMoveBaseOperator, PlanOperator,
                                             PreflightOperator, PrepareTargetOperator, ReleaseOperator,
                                             RollbackOperator, SummaryOperator, SwitchoverOperator,
                                             ValidateTableOperator)

__all__ = ["CleanupSourceOperator", "CopyTableOperator", "PrecopyDoneOperator", "SyncDeletionsOperator", "SyncSharedOperator", "SyncTableOperator", "GoNoGoOperator", "MaintenanceOnOperator",
           "OrgMoveBaseOperator", "PlanOperator", "PreflightOperator", "PrepareTargetOperator", "ReleaseOperator",
           "RollbackOperator", "SummaryOperator", "SwitchoverOperator", "ValidateTableOperator"]
