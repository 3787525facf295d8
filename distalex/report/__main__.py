from distalex.report.cli import main

main()
