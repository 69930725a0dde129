"""Models built on ``attnlab.nn.MultiheadAttention``: any registered mechanism plugs in by name.

>>> from attnlab.models import EncoderClassifier
>>> model = EncoderClassifier(vocab_size=1000, num_classes=6, mechanism="performer")
"""

from attnlab.models.blocks import TransformerBlock, TransformerStack
from attnlab.models.classifier import EncoderClassifier
from attnlab.models.graph import GATClassifier, GATLayer
from attnlab.models.han import HierarchicalAttentionNetwork
from attnlab.models.lm import DecoderLM
from attnlab.models.pair import PairClassifier
from attnlab.models.recurrent import LSTMClassifier
from attnlab.models.seq2seq import Seq2SeqTransformer
from attnlab.models.vision import UNetInpainter, ViTInpainter, inpainting_loss

__all__ = ["DecoderLM", "EncoderClassifier", "GATClassifier", "GATLayer",
           "HierarchicalAttentionNetwork", "LSTMClassifier", "PairClassifier",
           "Seq2SeqTransformer", "TransformerBlock", "TransformerStack", "UNetInpainter",
           "ViTInpainter", "inpainting_loss"]
