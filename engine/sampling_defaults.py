"""The one set of sampling defaults, for every path that samples a language model.

``SamplingParams()`` (the Python API), an engine.v1 or KServe request that leaves a field
unset, ``engine generate`` and ``engine client generate`` all take these values (a test checks
that the four agree). A module of its own so the CLI can show them without importing the
runtime. Why these values: README, "Sampling defaults".
"""

MAX_TOKENS = 64  # a function body; OpenAI's 16 stops mid-line
TEMPERATURE = 0.8  # sharpens a small model's flat distribution and keeps variety
TOP_P = 0.95  # nucleus sampling: drop the unreliable 5% tail (Holtzman et al., 2020)
TOP_K = 0  # off: top_p already adapts the cut to each distribution
