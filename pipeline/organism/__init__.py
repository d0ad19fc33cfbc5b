"""The organism's lab, apart from the product: the synthetic scenes it learns from (also the
benchmark `acs make-synthetic` writes), its architecture, its training batches, the recipe-driven
training loop and the probes that decide when it is done. The product (`pipeline.*`) never
imports from here except to generate benchmark data and to load the shipped checkpoint.
"""

from .batcher import Batcher, training_inputs
from .model import (OrganismConfig, build_organism, export_organism, init_number_embeddings, organism_configs,
                    save_checkpoint, set_input_size)

__all__ = ["Batcher", "OrganismConfig", "build_organism", "export_organism", "init_number_embeddings",
           "organism_configs", "save_checkpoint", "set_input_size", "training_inputs"]
