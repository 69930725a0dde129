"""The 23 attention names of the comparison project attnlab replaces, and what implements
each here: a registered mechanism, an option of a layer or model, a task's model, or a
training regime.

That project called 13 of its 23 mechanisms plain multi-head attention under another name;
here each name leads to the real thing, or says that it is not there yet and where it is
planned. ``attnlab info "Frequency domain"`` resolves a name of this table;
``attnlab list --seed-names`` prints it. A test checks that every mechanism named here is
registered and that every option named exists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["SEED_NAMES", "SeedName", "find_seed_name", "seed_key", "seed_names_markdown"]


@dataclass(frozen=True)
class SeedName:
    name: str                         # as the old project wrote it
    kind: str                         # mechanism | option | model | contract | regime
    mechanisms: tuple[str, ...] = ()  # registered mechanisms that implement it
    how: str = ""                     # where it is and how to use it
    planned: str = ""                 # not implemented yet: the issue that plans it


def _m(name, *mechanisms, how=""):
    return SeedName(name, "mechanism", tuple(mechanisms), how)


SEED_NAMES: tuple[SeedName, ...] = (
    SeedName("Multi-head", "option", ("sdpa",),
             "attnlab.nn.MultiheadAttention(embed_dim, num_heads, mechanism=NAME): every "
             "mechanism runs as heads of one layer (grouped-query heads: num_kv_heads)"),
    _m("Adaptive", "adaptive_span", how="a learned span per head (Sukhbaatar et al. 2019)"),
    _m("Local", "local", "sliding_window", "luong_monotonic", "luong_predictive",
       how="blocks (local), a band (sliding_window), Luong's local-m and local-p windows "
           "(seq2seq: --model-opt cross_mechanism=luong_predictive)"),
    _m("Global", "sdpa", "dot", "general",
       how="softmax over every key; Luong's global attention is dot / general"),
    SeedName("Hierarchical", "mechanism", ("hierarchical",),
             "H-Transformer-1D (mechanism); the HAN document classifier (Yang et al. 2016): "
             "attnlab train --task imdb --model han"),
    SeedName("Cross", "contract", ("sdpa",),
             "every mechanism with cross=yes takes Nq != Nk (queries of one sequence, keys "
             "of another): the seq2seq decoder's cross-attention"),
    SeedName("Self", "contract", ("sdpa",),
             "q, k, v from one sequence: every mechanism, in every encoder and decoder"),
    _m("Sparse (top-k)", "topk", how="the k largest scores per query (Zhao et al. 2019)"),
    SeedName("Convolutional", "mechanism", ("lightweight_conv", "dynamic_conv"),
             "Wu et al. 2019 (mechanisms); CvT-style convolutional Q/K/V projections: "
             "MultiheadAttention(..., conv_kernel_size=3)"),
    SeedName("Gated", "mechanism", ("gau",),
             "the gated attention unit (Hua et al. 2022); a sigmoid gate on every head's "
             "output for any mechanism: MultiheadAttention(..., output_gate=True)"),
    SeedName("Adversarial", "regime", (),
             "FGM / PGD perturbations of the embeddings (Miyato et al. 2017, Madry et al. "
             "2018): attnlab train --task emotions --regime adversarial --regime-opt "
             "train_attack=pgd; reports accuracy under a PGD attack and attention entropy"),
    SeedName("Graph", "mechanism", ("gat", "graph_dot"),
             "attention along a graph's edges; node classification: attnlab train --task sbm"),
    _m("Hard", "hard", how="one key per query: straight-through Gumbel or REINFORCE"),
    _m("Soft", "sdpa", how="soft attention = the softmax-weighted mean of the values"),
    SeedName("Transformer-XL", "model", (),
             "segment-level recurrence with relative positions (Dai et al. 2019): attnlab "
             "train --task wikitext2_xl --task-opt mem_len=64 (attention relative or rope)"),
    SeedName("BERT bidirectional", "contract", ("sdpa",),
             "every non-causal encoder attends both ways (the classification tasks' "
             "EncoderClassifier); masked-language-model pre-training: attnlab train --task "
             "mlm, then fine-tuning with --init-from RUN"),
    SeedName("Hybrid", "mechanism", ("hybrid",),
             "heads of different mechanisms in one layer: --mechanism hybrid --mech-opt "
             "heads=local*4+sdpa*4 (MultiheadAttention(mechanism='hybrid:local*4+sdpa*4')); "
             "one mechanism per layer: --model-opt layer_mechanisms=local,sdpa"),
    SeedName("Co-attention", "mechanism", ("co_attention_parallel", "co_attention_alternating"),
             "Lu et al. 2016, over two sequences; the two-sequence task: attnlab train "
             "--task fact_lookup"),
    SeedName("Axial", "mechanism", ("axial",),
             "rows, then columns of a 2-D grid; image inpainting: attnlab train --task "
             "inpaint_digits --mechanism axial"),
    _m("Frequency domain", "fnet", "global_filter",
       how="token mixing by the DFT (FNet) and a learned frequency filter (GFNet)"),
    SeedName("Distillation", "regime", (),
             "MiniLM attention + value-relation transfer from a trained teacher (Wang et al. "
             "2020): attnlab train --task emotions --regime distill --regime-opt "
             "teacher=RUN_DIR"),
    SeedName("Pooling", "option", (),
             "attention pooling of a sequence into one vector: the classifiers' "
             "--model-opt pooling=attention (attnlab.models.classifier.AttentionPooling)"),
    _m("Memory-augmented", "persistent_memory", "knn_memory",
       how="learned memory slots (all-attention) and a kNN memory of past keys "
           "(Memorizing Transformers)"),
)


def seed_key(name: str) -> str:
    """The comparison key of a name: lower case, letters and digits only ("Top-k" = "topk")."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def find_seed_name(name: str) -> SeedName | None:
    """The row whose name (or its part before a parenthesis) is ``name``, ignoring case and
    punctuation: "frequency-domain", "Sparse", "memory augmented"; None if none is."""
    key = seed_key(name)
    for row in SEED_NAMES:
        if key in (seed_key(row.name), seed_key(row.name.split("(")[0])):
            return row
    return None


def seed_names_markdown() -> str:
    """The table as Markdown, as docs/zoo.md holds it (a test keeps the two equal)."""
    lines = ["| name (old project) | kind | what implements it | how / where |",
             "|---|---|---|---|"]
    for r in SEED_NAMES:
        mechanisms = ", ".join(f"`{m}`" for m in r.mechanisms) or "-"
        how = f"not yet: {r.planned}" if r.planned else r.how
        lines.append(f"| {r.name} | {r.kind} | {mechanisms} | {how} |")
    return "\n".join(lines) + "\n"
