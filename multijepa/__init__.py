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

__version__ = "0.1.0"

from multijepa.errors import DataError, DecodeError, MultijepaError, RecipeError, TrainingError  # noqa: E402
from multijepa.recipe import Recipe, load_recipe, shipped_recipes  # noqa: E402
from multijepa import datasets  # noqa: E402


def pretrain(recipe: Recipe, data=None):
    """Train as the recipe says, on its own data or on ``data`` (a ``multijepa.datasets.Mixed``);
    returns the run folder (see :func:`multijepa.train.pretrain`)."""
    from multijepa.train import pretrain as _pretrain

    return _pretrain(recipe, data)


def load(path, device: str = "auto"):
    """Load a checkpoint for embedding: ``multijepa.load(path).embed(files_or_tensors)``."""
    from multijepa.embed import load as _load

    return _load(path, device)


__all__ = ["DataError", "datasets", "DecodeError", "MultijepaError", "Recipe", "RecipeError", "TrainingError", "load",
           "load_recipe", "pretrain", "shipped_recipes", "__version__"]
