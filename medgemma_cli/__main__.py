from medgemma_cli.entry import main

main()
