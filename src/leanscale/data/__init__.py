"""Open data sets and corpora: Fashion-MNIST, WordNet glosses, GCIDE and CPython's stdlib.

The data sets come from Debian packages (``make data``); :mod:`leanscale.data.paths` says where
they are looked for and how a missing one is reported. Everything here loads lazily: importing
this package reads no data and does not import ``tokenizers``.
"""

from leanscale.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IDX_DTYPES,
    FashionMNIST,
    FashionMNISTTensors,
    fashion_mnist_tensors,
    load_fashion_mnist,
    read_idx,
    write_idx,
)
from leanscale.data.paths import (
    CACHE_ENV,
    DATA_ROOT_ENV,
    DATASETS,
    DataFormatError,
    DataSetInfo,
    cache_dir,
    list_datasets,
    resolve_path,
)
from leanscale.data.text import (
    CORPORA,
    DOCUMENT_SEPARATOR,
    SPECIAL_TOKENS,
    TokenBatches,
    TokenStream,
    corpus_cache_key,
    encode_corpus,
    encode_text,
    load_corpus,
    train_bpe_tokenizer,
)
from leanscale.data.wordnet import (
    LEXICOGRAPHER_FILES,
    WORDNET_N_GLOSSES,
    WordNetGlosses,
    load_wordnet_glosses,
    train_test_split,
)

__all__ = [
    # paths
    "DATASETS",
    "DataSetInfo",
    "DataFormatError",
    "DATA_ROOT_ENV",
    "CACHE_ENV",
    "list_datasets",
    "resolve_path",
    "cache_dir",
    # Fashion-MNIST
    "IDX_DTYPES",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "FashionMNIST",
    "FashionMNISTTensors",
    "read_idx",
    "write_idx",
    "load_fashion_mnist",
    "fashion_mnist_tensors",
    # WordNet
    "LEXICOGRAPHER_FILES",
    "WORDNET_N_GLOSSES",
    "WordNetGlosses",
    "load_wordnet_glosses",
    "train_test_split",
    # text
    "CORPORA",
    "DOCUMENT_SEPARATOR",
    "SPECIAL_TOKENS",
    "load_corpus",
    "corpus_cache_key",
    "train_bpe_tokenizer",
    "encode_text",
    "encode_corpus",
    "TokenStream",
    "TokenBatches",
]
