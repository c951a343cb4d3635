from moe_align.train.cli import main

raise SystemExit(main())
