"""``nn.Embedding``: the per-sample gradient scatters each position's output gradient into its token's row.

As a factor: rows are one-hot token ids, columns are output gradients, so products reduce to sums over equal ids.
Positions holding ``padding_idx`` receive no gradient in PyTorch; their output gradients are zeroed here too.
"""

from __future__ import annotations

from torch import Tensor, nn

from inrun.engine.factors import DenseSide, Factor, IndexSide, OuterFactor
from inrun.engine.layers.registry import register_layer


class EmbeddingHandler:
    parameter_names = ("weight",)

    def check(self, module: nn.Module) -> str | None:
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq=True scales gradients by token counts across the whole batch, mixing samples"
        return None

    def factors(self, module: nn.Module, inputs: Tensor, grad_output: Tensor) -> dict[str, Factor]:
        n = inputs.shape[0]
        ids = inputs.reshape(n, -1)
        output_grads = grad_output.reshape(n, ids.shape[1], module.embedding_dim)
        if module.padding_idx is not None:
            output_grads = output_grads * (ids != module.padding_idx).unsqueeze(-1).to(output_grads.dtype)
        weight = OuterFactor(IndexSide(ids, module.num_embeddings), DenseSide(output_grads))
        return {"weight": weight}


register_layer(nn.Embedding, EmbeddingHandler())
