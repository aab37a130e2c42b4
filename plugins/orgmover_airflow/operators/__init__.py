from orgmover_airflow.operators.move import (CatchUpOperator, CleanupSourceOperator, CopyTablesOperator,
                                             OrgMoveBaseOperator, PlanOperator, PrecopyDoneOperator, PreflightOperator,
                                             PrepareTargetOperator, ReleaseOperator, ReplicateOperator, RollbackOperator,
                                             SummaryOperator, WriteWindowOperator)

__all__ = ["CatchUpOperator", "CleanupSourceOperator", "CopyTablesOperator", "OrgMoveBaseOperator",
           "PlanOperator", "PrecopyDoneOperator", "PreflightOperator", "PrepareTargetOperator", "ReleaseOperator",
           "ReplicateOperator", "RollbackOperator", "SummaryOperator", "WriteWindowOperator"]
