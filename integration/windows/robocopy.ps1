param([string]$Drive = 'X:')
. "$PSScriptRoot\common.ps1"
$src = Join-Path $env:TEMP 'cairn-robocopy-src'
if (-not (Test-Path $src)) { Copy-Item -Recurse "$env:WINDIR\Help" $src -ErrorAction SilentlyContinue }
robocopy $src "$Drive\robo" /E /COPY:DAT /DCOPY:T /NP /NFL /NDL | Out-Null
$second = robocopy $src "$Drive\robo" /E /COPY:DAT /DCOPY:T /NP /NFL /NDL /L
$copied = ($second | Select-String '^\s*Files\s*:\s*\d+\s+(\d+)').Matches.Groups[1].Value
Check 'robocopy twice copies nothing the second time' ($copied -eq '0') "$copied files copied again"
exit $script:Failures
