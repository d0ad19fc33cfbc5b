"""The per-query core (`Grounder.ground`) and the `acs ground` CLI."""

import json
import math

import numpy as np
import pytest
from conftest_values import PARROT_BOX  # noqa: F401  (placeholder, replaced below)
