from orgmover_airflow.sensors.replication import ReplicationSensor

__all__ = ["ReplicationSensor"]
