from lightning_ood.cli import main

main()
