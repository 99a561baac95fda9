from smskd.cli.commands import main

raise SystemExit(main())
