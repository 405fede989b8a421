-- Databases beside the catalogue's (POSTGRES_DB=astr), all owned by POSTGRES_USER.
CREATE DATABASE prefect OWNER astr;
CREATE DATABASE mlflow OWNER astr;
CREATE DATABASE optuna OWNER astr;
