"""Pure astronomy: images, simulation, preprocessing, ZOGY differencing, detection, validation.

Nothing here knows about Prefect, MLflow or notebooks.
"""
