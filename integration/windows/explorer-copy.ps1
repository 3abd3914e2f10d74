param([string]$Drive = 'X:')
. "$PSScriptRoot\common.ps1"
$src = Join-Path $env:TEMP 'cairn-10k'
if (-not (Test-Path $src)) {
    1..100 | ForEach-Object { $d = New-Item -ItemType Directory "$src\d$_" -Force
        1..100 | ForEach-Object { Set-Content "$($d.FullName)\f$_.txt" "file $_ of $($d.Name)" } }
}
New-Item -ItemType Directory "$Drive\explorer" -Force | Out-Null
$shell = New-Object -ComObject Shell.Application
$shell.Namespace("$Drive\explorer").CopyHere($src, 0x614)  # no UI, yes to all
$a = Get-ChildItem $src -Recurse -File | Get-FileHash | ForEach-Object Hash | Sort-Object
$b = Get-ChildItem "$Drive\explorer\cairn-10k" -Recurse -File | Get-FileHash | ForEach-Object Hash | Sort-Object
Check 'Explorer copy of 10,000 files is identical' ($a.Count -eq 10000 -and -not (Compare-Object $a $b)) "$($b.Count) files"
exit $script:Failures
