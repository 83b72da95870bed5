from megatron_archer.quickstart.pipeline import main

raise SystemExit(main())
