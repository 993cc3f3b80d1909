"""Token vectors from latent semantic analysis (LSA) of the pretraining text, file by file.

Tokens that occur in the same files get similar vectors: the topic of the package a file
belongs to, learned without a label from the stdlib source the classifier may read (its
held-out files excluded). TF-IDF over a files x tokens count matrix, then a truncated SVD,
both scikit-learn's; a few seconds of CPU against minutes of MLM pretraining to learn the same.
"""

from __future__ import annotations

import numpy as np


def lsa_vectors(stream: np.ndarray, eot_id: int, vocab_size: int, dim: int) -> np.ndarray:
    """Return (vocab_size, dim) float32 token vectors of unit length (zero for unseen tokens).

    ``stream`` is token ids with ``eot_id`` closing each file, as ``encode_files`` writes it.
    """
    from scipy.sparse import csr_matrix
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfTransformer

    tokens = np.asarray(stream, dtype=np.int64)
    file_of = np.cumsum(tokens == eot_id) - (tokens == eot_id)  # the EOT belongs to its file
    keep = tokens != eot_id
    counts = csr_matrix(
        (np.ones(int(keep.sum()), np.float32), (file_of[keep], tokens[keep])),
        shape=(int(file_of.max()) + 1, vocab_size),
    )  # (files, vocab); duplicates are summed
    weighted = TfidfTransformer(norm=None, sublinear_tf=True).fit_transform(counts)
    svd = TruncatedSVD(dim, algorithm="randomized", random_state=0).fit(weighted)
    vectors = (svd.components_.T * svd.singular_values_).astype(np.float32)  # (vocab, dim)
    seen = np.asarray(counts.sum(axis=0)).ravel() > 0  # the SVD leaves noise on unseen ones
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
    return np.where(seen[:, None], unit, 0.0).astype(np.float32)
