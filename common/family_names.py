"""The model families by name, known without importing torch: the API's schema and the CLI
list them before any model loads.

Each name stands for the class in its own file under common/ml/families/, which the registry
(common.ml.families.FAMILIES) imports from here; what a family is (its kind, whether it draws
for prompts, the config fields naming pretrained folders, whether it takes an adapter) its
class says. A new family is its file plus one line here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

CLASSES = {
    "vae": "common.ml.families.vae:VAEFamily",
    "gan": "common.ml.families.gan:GANFamily",
    "diffusion": "common.ml.families.diffusion:DiffusionFamily",
    "lstm": "common.ml.families.lstm:LSTMFamily",
    "lm": "common.ml.families.lm:LMFamily",
}
# the name before `lm` took any architecture: old specs, checkpoints and models keep it
ALIASES = {"gpt": "lm"}

if TYPE_CHECKING:
    FamilyName = str
else:  # a Literal of the names, so the OpenAPI schema lists them (TrainSpec.family)
    FamilyName = Literal[(*CLASSES, *ALIASES)]


def canonical_family(family: str) -> str:
    """The family a name stands for: `lm` for its alias `gpt`."""
    return ALIASES.get(family, family)
