param([string]$Drive = 'X:')
. "$PSScriptRoot\common.ps1"
$t = [IO.File]::Create("$Drive\~`$owner.docx", 4096, 'DeleteOnClose'); $t.Write([byte[]](1..100), 0, 100); $t.Dispose()
& $Cairn sync | Out-Null
Check 'delete-on-close never uploads' (-not (Test-Path "$Drive\~`$owner.docx")) 'file still there'
New-Item -ItemType Directory "$Drive\full" | Out-Null; Set-Content "$Drive\full\f" 'x'
$refused = $false; try { [IO.Directory]::Delete("$Drive\full") } catch { $refused = $true }
Check 'non-empty directory refuses delete' $refused 'deleted'
Set-Content "$Drive\a.txt" 'A'; Set-Content "$Drive\b.txt" 'B'
[IO.File]::Move("$Drive\a.txt", "$Drive\b.txt", $true)
Check 'replace-by-rename of a file' ((Get-Content "$Drive\b.txt") -eq 'A') 'content'
New-Item -ItemType Directory "$Drive\d1", "$Drive\d2" | Out-Null
$refused = $false; try { [IO.Directory]::Move("$Drive\d1", "$Drive\d2") } catch { $refused = $true }
Check 'never replaces a directory' $refused 'replaced'
Rename-Item "$Drive\b.txt" 'B.TXT'
Check 'case-only rename' ((Get-ChildItem $Drive -Name) -ccontains 'B.TXT') 'old case'
exit $script:Failures
