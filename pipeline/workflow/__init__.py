"""Workflow services on top of the flows: the Prefect server, monitoring and status mapping.

Importing this package is cheap: it does not import Prefect. Import the submodules
(``pipeline.workflow.prefect_server``...) for what they hold.
"""
