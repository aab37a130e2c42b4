from orgmover_airflow.operators.move import (CatchUpOperator, CleanupSourceOperator, CopyTableOperator, OrgMoveBaseOperator,
                                             PlanOperator, PrecopyDoneOperator, PreflightOperator, PrepareTargetOperator,
                                             ReleaseOperator, ReplicateOperator, RollbackOperator, SummaryOperator,
                                             SwitchoverOperator, WriteWindowOperator)

__all__ = ["CatchUpOperator", "CleanupSourceOperator", "CopyTableOperator", "OrgMoveBaseOperator", "PlanOperator",
           "PrecopyDoneOperator", "PreflightOperator", "PrepareTargetOperator", "ReleaseOperator", "ReplicateOperator",
           "RollbackOperator", "SummaryOperator", "SwitchoverOperator", "WriteWindowOperator"]
