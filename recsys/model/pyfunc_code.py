"""The MLflow "models from code" entry of the recommender pyfunc (``recsys.model.pyfunc``).

MLflow stores this file with the model and runs it at load time instead of unpickling a Python
object: a registered model version holds code we wrote and data files (safetensors, JSON,
Parquet), never a pickle that would run whatever its writer put in it.
"""

import mlflow.models

from recsys.model.pyfunc import RecommenderPyfunc

mlflow.models.set_model(RecommenderPyfunc())
