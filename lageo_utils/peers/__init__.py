"""Peer methods from outside lageo, run on the same data and scored with the same metrics.

- :mod:`lageo_utils.peers.geoclip`: GeoCLIP (NeurIPS'23) answering from an LA GPS gallery, and
  its image head and location encoder fine-tuned on the LA training split.

Peers need the optional extra ``pip install -e '.[peers]'``; the modules import without it and
say so when a peer is asked for.
"""
