param([string]$Drive = 'X:')
. "$PSScriptRoot\common.ps1"
# WinFsp has no hard links (winfsp/winfsp#28, #390): CreateHardLink is
# refused by WinFsp itself, before cairn sees it. The refusal must be an
# error to the caller, leave no second name, and leave the file as it was.
Set-Content "$Drive\linked.txt" 'L'
$refused = $false
try { New-Item -ItemType HardLink -Path "$Drive\second.txt" -Target "$Drive\linked.txt" -ErrorAction Stop | Out-Null }
catch { $refused = $true }
Check 'a hard link is refused with an error' $refused 'made'
Check 'the refusal leaves no second name' (-not (Test-Path "$Drive\second.txt")) 'second.txt exists'
Check 'the file is as it was' ((Get-Content "$Drive\linked.txt") -eq 'L') 'content'
exit $script:Failures
