from orgmover_airflow.triggers.replication import ReplicationTrigger

__all__ = ["ReplicationTrigger"]
