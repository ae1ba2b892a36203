from dpo_cli.cli import main

main()
