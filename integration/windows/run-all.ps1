# Mounts cairn at -Drive, runs the acceptance tests, unmounts. Exit code:
# the number of failed checks.
param([string]$Drive = 'X:', [string]$Only = '')
. "$PSScriptRoot\common.ps1"
$p = Start-Cairn $Drive
$total = 0
foreach ($t in 'seal', 'delete-rename', 'hardlinks', 'names', 'notepad', 'word', 'robocopy', 'explorer-copy', 'volume') {
    if ($Only -and $Only -ne $t) { continue }
    & "$PSScriptRoot\$t.ps1" -Drive $Drive; $total += $LASTEXITCODE
}
if (-not $Only -or $Only -eq 'winfsp-tests') {
    $wt = "${env:ProgramFiles(x86)}\WinFsp\bin\winfsp-tests-x64.exe"
    Push-Location "$Drive\"
    & $wt --external --resilient -reparse* -stream* -ea* -setsecurity* -querydir_buffer_overflow_test
    if ($LASTEXITCODE) { Write-Host "FAIL winfsp-tests"; $total++ } else { Write-Host 'PASS winfsp-tests' }
    Pop-Location
}
if (-not $Only -or $Only -eq 'crash') { & "$PSScriptRoot\crash.ps1" -Drive $Drive -Process $p; $total += $LASTEXITCODE }
else { Stop-Cairn $p }
Write-Host "$total failed checks"
exit $total
