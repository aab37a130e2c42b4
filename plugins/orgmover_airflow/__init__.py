"""Airflow-facing code of orgmover: hooks (one connection each), operators (thin, call the domain
library ``orgmover``), and the UI plugin. Importable as a package so the DAG processor, workers and
the triggerer share it."""
