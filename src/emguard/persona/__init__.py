"""Persona vectors: extraction (``emguard persona extract``) and the dataset risk screen (``emguard screen``)."""

from emguard.persona.activations import response_activations
from emguard.persona.extract import PersonaResult, extract_persona
from emguard.persona.screen import run_screen, screen_dataset
from emguard.persona.traits import Trait, load_trait
from emguard.persona.vector import layer_separation, mean_difference

__all__ = [
    "PersonaResult",
    "Trait",
    "extract_persona",
    "layer_separation",
    "load_trait",
    "mean_difference",
    "response_activations",
    "run_screen",
    "screen_dataset",
]
