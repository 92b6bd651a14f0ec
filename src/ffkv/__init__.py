"""ffkv: what does each FFN memory of a causal LM store, and what does it do to the prediction?"""

from .atlas import Atlas
from .corpus import load_corpus
from .errors import FfkvError
from .models import load_model
from .scan import ScanConfig, scan
from .version import __version__

__all__ = ["Atlas", "FfkvError", "ScanConfig", "load_corpus", "load_model", "scan", "__version__"]
