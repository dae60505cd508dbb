import sys

from pllm_kernels.bench import main

sys.exit(main())
