"""Small torch models the tests train (imported only by tests that have torch)."""

import torch


class TinyTransformer(torch.nn.Module):
    """An embedding, one transformer encoder layer (with dropout) and a projection."""

    def __init__(self, vocab=64, dim=32):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.block = torch.nn.TransformerEncoderLayer(dim, 4, 64, dropout=0.1, batch_first=True)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, tokens):
        return self.head(self.block(self.embed(tokens)))
