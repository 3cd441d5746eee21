"""multijepa: self-supervised JEPA pretraining for images, video, audio, time series and point clouds.

>>> import multijepa as mj
>>> recipe = mj.load_recipe("recipes/image.yaml", overrides=["data.path=photos/"])  # doctest: +SKIP
>>> run = mj.pretrain(recipe)                                                       # doctest: +SKIP
>>> vectors = mj.load(run / "last.pt").embed(["a.jpg", "b.png"])                    # doctest: +SKIP

Several modalities, one model (docs/mixed.md):

>>> data = mj.datasets.Mixed({"audio": mj.datasets.AudioFolder("speech/"),
...                           "image": mj.datasets.ImageFolder("photos/")}, weights={"audio": 2, "image": 1})
>>> run = mj.pretrain(mj.load_recipe("recipes/multimodal.yaml"), data=data)        # doctest: +SKIP
>>> vectors = mj.load(run / "last.pt").embed(["a.wav", "b.jpg"])                   # doctest: +SKIP
"""

from multijepa import datasets
from multijepa._version import __version__
from multijepa.embed import Embedder, load
from multijepa.errors import DataError, DecodeError, MissingExtraError, MultijepaError, RecipeError, TrainingError
from multijepa.export import export, info
from multijepa.recipe import Recipe, load_recipe, shipped_recipes
from multijepa.train import pretrain


__all__ = ["DataError", "datasets", "DecodeError", "Embedder", "export", "info", "MissingExtraError", "MultijepaError",
           "Recipe", "RecipeError", "TrainingError", "load", "load_recipe", "pretrain", "shipped_recipes", "__version__"]
