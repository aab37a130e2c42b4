from orgmover_airflow.operators.move import (CatchUpOperator, CleanupSourceOperator, ReplicateFinalOperator, ReplicateOperator, CopyTableOperator, PrecopyDoneOperator, SyncAllOperator, ValidateAllOperator, GoNoGoOperator,
                                             MaintenanceOnOperator, OrgMoveBaseOperator, PlanOperator,
                                             PreflightOperator, PrepareTargetOperator, ReleaseOperator,
                                             RollbackOperator, SummaryOperator, SwitchoverOperator)

__all__ = ["CatchUpOperator", "CleanupSourceOperator", "ReplicateFinalOperator", "ReplicateOperator", "CopyTableOperator", "PrecopyDoneOperator", "SyncAllOperator", "ValidateAllOperator", "GoNoGoOperator", "MaintenanceOnOperator",
           "OrgMoveBaseOperator", "PlanOperator", "PreflightOperator", "PrepareTargetOperator", "ReleaseOperator",
           "RollbackOperator", "SummaryOperator", "SwitchoverOperator"]
