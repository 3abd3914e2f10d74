param([string]$Drive = 'X:', $Process)
. "$PSScriptRoot\common.ps1"
1..50 | ForEach-Object { Set-Content "$Drive\closed-$_.txt" "file $_" }
$w = [IO.File]::Open("$Drive\open.bin", 'Create'); $w.Write([byte[]]::new(1MB), 0, 1MB)
Stop-Process -Id $Process.Id -Force
$p = Start-Cairn $Drive
$ok = (1..50 | Where-Object { (Get-Content "$Drive\closed-$_.txt") -ne "file $_" }).Count -eq 0
Check 'every closed file survives a kill' $ok 'a closed file differs'
Stop-Cairn $p
exit $script:Failures
