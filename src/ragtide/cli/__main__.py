from ragtide.cli import main

main()
