from vqa2cli.cli import main

main()
