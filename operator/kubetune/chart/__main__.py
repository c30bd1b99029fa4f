from kubetune.chart.generate import main

raise SystemExit(main())
