"""Engines: computational cores that mechanisms are built on, not mechanisms themselves.

An engine registers nothing and belongs to no family: it computes a form of attention
from what a mechanism hands it (a sparse pattern, feature maps) and may serve mechanisms
of several families. The files beside this one in :mod:`attnlab.mechanisms` are the
families, one file (or package) each; what they share lives here:

* :mod:`~attnlab.mechanisms._engines.blocksparse`: block-sparse attention from a pattern's
  block layout and token predicate (the blocked PyTorch backend);
* :mod:`~attnlab.mechanisms._engines.sparse_flex`: the FlexAttention backend of the same
  patterns and :class:`~attnlab.mechanisms._engines.sparse_flex.SparseMechanism`, the base
  of every mechanism given by a pattern, which picks a backend per call;
* :mod:`~attnlab.mechanisms._engines.kernel_causal`: feature-map (linear) attention with
  its chunked causal prefix sums and hand-written backward;
* :mod:`~attnlab.mechanisms._engines.kernel_decode`: decoding feature-map attention with
  its recurrent state ``S, z`` (chunkwise prefill, the Performer's running max);
* :mod:`~attnlab.mechanisms._engines.window_decode`: decoding causal windows (sliding,
  local, dilated, longformer, adaptive span, convolutions) with a rolling buffer of
  keys/values and their positions.
"""
