from pllm_kernels.bench import main

raise SystemExit(main())
