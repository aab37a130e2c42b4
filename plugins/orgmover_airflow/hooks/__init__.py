from orgmover_airflow.hooks.cell import CellHook
from orgmover_airflow.hooks.state import MoverStateHook
from orgmover_airflow.hooks.topology import TopologyHook

__all__ = ["CellHook", "MoverStateHook", "TopologyHook"]
