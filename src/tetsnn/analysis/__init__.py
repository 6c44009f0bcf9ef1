"""Analysis of spiking models: firing rates, synaptic operations and energy (``profile``)."""
from .profile import AC_PJ, MAC_PJ, conv_synops, dense_macs, format_table, linear_synops, profile

__all__ = ["profile", "format_table", "conv_synops", "linear_synops", "dense_macs", "MAC_PJ", "AC_PJ"]
