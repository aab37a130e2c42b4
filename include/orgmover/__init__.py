"""orgmover: move one GitLab organization between cells (domain library, no Airflow)."""

__version__ = "0.1.0"
