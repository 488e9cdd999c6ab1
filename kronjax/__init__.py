"""kronjax: Kronecker Embeddings (arXiv 2605.29459) in JAX/Flax.

`KroneckerEmbed` is a drop-in for `flax.linen.Embed` whose only parameter is the
(256 * pos_dim, d_model) projection; `ByteVocab` gives each token id its exact bytes.
"""

from kronjax.codec import closed_form, codec_dim, codec_table, codec_vectors, reference_codec
from kronjax.embed import ByteOverride, KroneckerEmbed
from kronjax.vocab import ByteVocab, encode_bytes, truncate

__version__ = "0.1.0"

__all__ = [
    "ByteOverride", "ByteVocab", "KroneckerEmbed", "closed_form", "codec_dim", "codec_table",
    "codec_vectors", "encode_bytes", "reference_codec", "truncate", "__version__",
]
