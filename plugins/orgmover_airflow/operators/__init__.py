from orgmover_airflow.operators.move import (CleanupSourceOperator, ReplicateFinalOperator, ReplicateOperator, CopyTableOperator, PrecopyDoneOperator, SyncAllOperator, SyncDeletionsOperator, SyncSharedOperator, SyncTableOperator, ValidateAllOperator, GoNoGoOperator,
                                             MaintenanceOnOperator, OrgMoveBaseOperator, PlanOperator,
                                             PreflightOperator, PrepareTargetOperator, ReleaseOperator,
                                             RollbackOperator, SummaryOperator, SwitchoverOperator,
                                             ValidateTableOperator)

__all__ = ["CleanupSourceOperator", "ReplicateFinalOperator", "ReplicateOperator", "CopyTableOperator", "PrecopyDoneOperator", "SyncAllOperator", "SyncDeletionsOperator", "ValidateAllOperator", "SyncSharedOperator", "SyncTableOperator", "GoNoGoOperator", "MaintenanceOnOperator",
           "OrgMoveBaseOperator", "PlanOperator", "PreflightOperator", "PrepareTargetOperator", "ReleaseOperator",
           "RollbackOperator", "SummaryOperator", "SwitchoverOperator", "ValidateTableOperator"]
