"""World models: an action-conditioned predictor over a frozen multijepa encoder's tokens, latent
rollouts, and planning with CEM or MPPI (docs/world-models.md).

>>> import multijepa.worldmodel as wmod
>>> run = wmod.train_world_model(wmod.load_worldmodel_recipe("recipes/worldmodel.yaml"))  # doctest: +SKIP
>>> wm = wmod.WorldModel.load(run / "last.pt")                                            # doctest: +SKIP
>>> wmod.evaluate_planning(wm, "Reacher-v5", episodes=10)["success_rate"]                 # doctest: +SKIP
"""

from multijepa.worldmodel.model import (ActionPredictor, WorldModel, WorldModelConfig, WorldModelRecipe,
                                        block_causal_mask, rollout_latents)
from multijepa.worldmodel.observe import ObservationEncoder
from multijepa.worldmodel.plan import PLANNERS, TASKS, ReacherGoals, cem, evaluate_planning, mppi
from multijepa.worldmodel.train import load_any_recipe, load_worldmodel_recipe, train_world_model

__all__ = ["ActionPredictor", "ObservationEncoder", "PLANNERS", "ReacherGoals", "TASKS", "WorldModel",
           "WorldModelConfig", "WorldModelRecipe", "block_causal_mask", "cem", "evaluate_planning",
           "load_any_recipe", "load_worldmodel_recipe", "mppi", "rollout_latents", "train_world_model"]
