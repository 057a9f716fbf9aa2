"""``none``: the backdoored model itself, evaluated like any defended model (the baseline rows)."""

from ..params import NoParams
from . import defense


@defense("none", "no defense: the backdoored model as it is", NoParams, family="none", needs_data=False)
def no_defense(model, data, params, device):
    return model
