"""cogfun.common."""

import logging

# peft imports bitsandbytes whenever it is installed (cogfun installs it for --use-8bit-adam), and
# on CPUs with AVX512-BF16 bitsandbytes then warns that a 4-bit matmul kernel could not be fetched
# from the Hub. cogfun never uses 4-bit layers, so the warning is noise on every command.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
