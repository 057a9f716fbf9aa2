"""``none``: the backdoored model itself, evaluated like any defended model (the baseline rows)."""

from ..params import NoParams
from ..passes import no_passes
from . import defense


@defense("none", "no defense: the backdoored model as it is", NoParams,
         family="none", needs_data=False, passes=no_passes)
def no_defense(model, data, params, device):
    return model
