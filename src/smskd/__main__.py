from smskd.cli import main

raise SystemExit(main())
